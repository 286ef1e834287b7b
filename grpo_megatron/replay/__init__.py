"""MoE routing replay (R2: the old-policy pass's routes; R3: the rollout engine's) and routing agreement."""
from grpo_megatron.replay.controller import MODES, OLD_CURRENT, ROLLOUT_TRAIN, RoutingReplay, attach_routing_replay
from grpo_megatron.replay.routers import LayerReplay, RoutingReplayError, moe_layer_numbers
from grpo_megatron.replay.tables import RouteTable

__all__ = ["MODES", "OLD_CURRENT", "ROLLOUT_TRAIN", "LayerReplay", "RouteTable", "RoutingReplay",
           "RoutingReplayError", "attach_routing_replay", "moe_layer_numbers"]
