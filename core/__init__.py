"""SiteBridge core: algorithms and site data handling. Never imports flwr or grpc."""
