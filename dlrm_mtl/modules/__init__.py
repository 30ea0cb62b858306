from dlrm_mtl.modules.cgc import CGCLayer
from dlrm_mtl.modules.expert_bank import ExpertBank
from dlrm_mtl.modules.gates import SoftmaxGate
from dlrm_mtl.modules.interaction import DotInteraction
from dlrm_mtl.modules.mlp import MLP
from dlrm_mtl.modules.scenario_layer import ScenarioLayer

__all__ = ["CGCLayer", "DotInteraction", "ExpertBank", "MLP", "ScenarioLayer", "SoftmaxGate"]
