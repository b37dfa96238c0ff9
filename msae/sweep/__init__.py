"""The sweep service: Ray Tune trials over SAE grids, MLflow tracking, Pareto fronts."""
