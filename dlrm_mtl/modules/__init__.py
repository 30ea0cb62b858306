from dlrm_mtl.modules.aesm import AESMScenarioLayer, AESMTaskLayer, ExpertSelection, select_experts
from dlrm_mtl.modules.cross_stitch import CrossStitchLayer, cross_stitch_init
from dlrm_mtl.modules.asymmetric import AsymmetricLayer, resolve_task_edges, task_dag_order
from dlrm_mtl.modules.sluice import SluiceLayer, subspace_orthogonality
from dlrm_mtl.modules.expert_bank import ExpertBank
from dlrm_mtl.modules.gates import SoftmaxGate
from dlrm_mtl.modules.gates import GATE_KINDS, NoisyGate, TopKGate, keep_top_k, make_gate
from dlrm_mtl.modules.interaction import ConcatInteraction, DotInteraction
from dlrm_mtl.modules.layer_output import LayerOutput
from dlrm_mtl.modules.mlp import MLP
from dlrm_mtl.modules.mixture import mix_experts
from dlrm_mtl.modules.mmoe import MMoELayer, SharedBottomLayer
from dlrm_mtl.modules.ml_mmoe import MultiLevelMMoELayer
from dlrm_mtl.modules.ple import ExtractionNetwork, PLELayer
from dlrm_mtl.modules.scenario_cgc import ScenarioCGCLayer
from dlrm_mtl.modules.scenario_routing import ScenarioGroups, group_by_scenario
from dlrm_mtl.modules.task_input import split_task_input
from dlrm_mtl.modules.partitioned_norm import PartitionedNorm
from dlrm_mtl.modules.star_fcn import StarTopologyFCN
from dlrm_mtl.modules.star import STARLayer
from dlrm_mtl.modules.hmoe import HMoELayer
from dlrm_mtl.modules.sub_expert_integration import SubExpertIntegration
from dlrm_mtl.modules.hinet import HiNetScenarioLayer, ScenarioAwareAttention
from dlrm_mtl.modules.towers import TaskTowers

__all__ = [
    "ConcatInteraction",
    "DotInteraction",
    "ExpertBank",
    "ExtractionNetwork",
    "LayerOutput",
    "MLP",
    "mix_experts",
    "MMoELayer",
    "PLELayer",
    "ScenarioCGCLayer",
    "ScenarioGroups",
    "group_by_scenario",
    "SharedBottomLayer",
    "SoftmaxGate",
    "split_task_input",
    "AESMScenarioLayer",
    "AESMTaskLayer",
    "CrossStitchLayer",
    "ExpertSelection",
    "GATE_KINDS",
    "MultiLevelMMoELayer",
    "NoisyGate",
    "TopKGate",
    "cross_stitch_init",
    "AsymmetricLayer",
    "resolve_task_edges",
    "task_dag_order",
    "SluiceLayer",
    "subspace_orthogonality",
    "keep_top_k",
    "make_gate",
    "select_experts",
    "PartitionedNorm",
    "StarTopologyFCN",
    "STARLayer",
    "HMoELayer",
    "SubExpertIntegration",
    "HiNetScenarioLayer",
    "ScenarioAwareAttention",
    "TaskTowers",
]
