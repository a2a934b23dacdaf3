"""`kubectl recserve`: operate RecommenderModel rollouts from the terminal."""
