from dlrm_mtl.models.ranking_model import DenseArch, MultiScenarioMultiTaskModel, TrainModule, embedding_configs

__all__ = ["DenseArch", "MultiScenarioMultiTaskModel", "TrainModule", "embedding_configs"]
