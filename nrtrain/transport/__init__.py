"""Flow matching, separate from the model (the willisma/SiT `transport/` split).

`path`: the linear interpolant (t = 1 noise), training-time t and the timestep shift.
`loss`: the objective on a PackedBatch. `cfg`: guidance on a doubled pack. `solvers`: the samplers.
The model is only ever called as model(x [T, D], t [B], y [B], batch) -> v [T, D].
"""

from nrtrain.transport.cfg import GuidedField, double_for_cfg
from nrtrain.transport.loss import FlowMatchingLoss, LossTerms, reduction_weights
from nrtrain.transport.path import interpolate, sample_t, score_from_velocity, shift_t, velocity_target
from nrtrain.transport.solvers import (NIT_PRESETS, ImageNoise, SamplerConfig, SampleResult, noise_for, noise_pack,
                                       sample, time_grid)

__all__ = ["FlowMatchingLoss", "GuidedField", "ImageNoise", "LossTerms", "NIT_PRESETS", "SampleResult",
           "SamplerConfig", "double_for_cfg", "interpolate", "noise_for", "noise_pack", "reduction_weights",
           "sample", "sample_t", "score_from_velocity", "shift_t", "time_grid", "velocity_target"]
