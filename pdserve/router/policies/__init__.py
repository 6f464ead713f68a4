"""Selection policies, one per module, behind :class:`~pdserve.router.policies.base.Policy`."""

from __future__ import annotations

from pdserve.router.config import RouterConfig
from pdserve.router.policies.base import Policy
from pdserve.router.policies.cache_aware import CacheAwarePolicy
from pdserve.router.policies.least_load import LeastLoadPolicy
from pdserve.router.policies.power_of_two import PowerOfTwoPolicy
from pdserve.router.policies.random import RandomPolicy
from pdserve.router.policies.round_robin import RoundRobinPolicy

POLICY_CLASSES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (RandomPolicy, RoundRobinPolicy, LeastLoadPolicy, PowerOfTwoPolicy, CacheAwarePolicy)
}


def make_policy(name: str, config: RouterConfig) -> Policy:
    """The policy called ``name``, configured from ``config``."""
    if name == CacheAwarePolicy.name:
        return CacheAwarePolicy(
            threshold=config.cache_threshold,
            abs_threshold=config.balance_abs_threshold,
            rel_threshold=config.balance_rel_threshold,
            max_blocks=config.max_tree_size,
            block_chars=config.cache_block_chars,
        )
    try:
        return POLICY_CLASSES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_CLASSES)}") from None


__all__ = ["POLICY_CLASSES", "Policy", "make_policy"]
