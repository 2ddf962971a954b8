"""The built-in expert types and sharding strategies, registered through the same hooks as
third-party plugins."""

from __future__ import annotations

from vmoe_layers.experts import GluExperts, MlpExperts
from vmoe_layers.sharding import DataParallel, ExpertFullySharded, ExpertParallel, FullySharded
from vmoe_routing import hookimpl


@hookimpl
def vmoe_expert_types():
    return {MlpExperts.name: MlpExperts, GluExperts.name: GluExperts}


@hookimpl
def vmoe_sharding_strategies():
    strategies = (DataParallel, ExpertParallel, FullySharded, ExpertFullySharded)
    return {s.name: s.create for s in strategies}
