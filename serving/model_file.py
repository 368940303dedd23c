"""The file MLflow logs as the ranking model's code ("models from code").

Logging code instead of a pickled object means loading the registered model never unpickles
anything: MLflow runs this file (with the model's code_paths, gems/ and serving/, importable) and
takes the model it sets.
"""

import mlflow.models

from serving.ranker import GemsRanker

mlflow.models.set_model(GemsRanker())
