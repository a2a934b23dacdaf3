"""RecServe operator: reconciles RecommenderModels into Triton deployments and traffic."""
