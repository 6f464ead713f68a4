"""Selection policies, one per module, behind :class:`~pdserve.router.policies.base.Policy`."""

from __future__ import annotations

from pdserve.router.config import RouterConfig
from pdserve.router.policies.base import Policy
from pdserve.router.policies.cache_aware import CacheAwarePolicy
from pdserve.router.policies.least_load import LeastLoadPolicy
from pdserve.router.policies.power_of_two import PowerOfTwoPolicy
from pdserve.router.policies.prefix import PrefixPolicy
from pdserve.router.policies.random import RandomPolicy
from pdserve.router.policies.round_robin import RoundRobinPolicy
from pdserve.router.prefix_index import CacheIndex

POLICY_CLASSES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (RandomPolicy, RoundRobinPolicy, LeastLoadPolicy, PowerOfTwoPolicy, CacheAwarePolicy, PrefixPolicy)
}


def make_policy(name: str, config: RouterConfig, index: CacheIndex | None = None) -> Policy:
    """The policy called ``name``, configured from ``config``; cache-based ones share ``index``."""
    if index is None:
        index = CacheIndex(config.max_tree_size, config.cache_block_chars)
    if name == CacheAwarePolicy.name:
        return CacheAwarePolicy(
            index,
            threshold=config.cache_threshold,
            abs_threshold=config.balance_abs_threshold,
            rel_threshold=config.balance_rel_threshold,
        )
    if name == PrefixPolicy.name:
        return PrefixPolicy(index, abs_threshold=config.balance_abs_threshold,
                            rel_threshold=config.balance_rel_threshold)
    try:
        return POLICY_CLASSES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_CLASSES)}") from None


__all__ = ["POLICY_CLASSES", "Policy", "make_policy"]
