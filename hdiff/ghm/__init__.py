"""Generative hierarchical models: kernels, the GHM, random families, layouts, enumeration."""

from hdiff.ghm.enumerate import Enumeration, count_trees, enumerate_strings, enumerate_trees
from hdiff.ghm.kernels import FactorizedKernel, Kernel, ProductionKernel
from hdiff.ghm.layout import from_tree_order, level_shape, to_tree_order
from hdiff.ghm.model import GHM, Entropy
from hdiff.ghm.random import random_factorized, random_hierarchy

__all__ = [
    "GHM", "Entropy", "ProductionKernel", "FactorizedKernel", "Kernel", "Enumeration",
    "enumerate_trees", "enumerate_strings", "count_trees", "random_hierarchy", "random_factorized",
    "to_tree_order", "from_tree_order", "level_shape",
]
