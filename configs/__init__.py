"""Built-in configs (surveys, feature schema, models, runs, evaluation studies), installed as `sommelier_configs`."""
