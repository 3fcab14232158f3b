"""advex.engine: pure PyTorch. Threat models, objectives, one projected-gradient loop,
attacks, training, evaluation, model zoo and loaders, data sources. Never imports grpc."""
