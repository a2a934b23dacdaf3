"""Local Kubernetes test clusters for RecServe: real control-plane binaries plus kwok GPU nodes."""
