"""Schedulers: hdiff's exact discrete schedulers, and one adapter from any denoiser to any scheduler."""

from hdiff.schedulers._discrete_base import DiscreteSchedulerOutput
from hdiff.schedulers.adapter import SchedulerModelAdapter
from hdiff.schedulers.factory import make_scheduler, scheduler_options
from hdiff.schedulers.masked import MaskedDiffusionScheduler
from hdiff.schedulers.uniform import UniformDiffusionScheduler

__all__ = ["SchedulerModelAdapter", "MaskedDiffusionScheduler", "UniformDiffusionScheduler", "DiscreteSchedulerOutput",
           "make_scheduler", "scheduler_options"]
