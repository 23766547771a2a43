"""Which ISA the kernel tests render for. Their hand-written knob tables (tiles, blocks,
register budgets) are written for 8-lane vectors: on an AVX-512 CPU they run as AVX2 kernels
(which it executes too); the AVX-512 kernels are covered there by the default-knob paths
(test_models, test_fuzz, test_clients, test_graph), random legal points of every search
space (test_space) and test_depthwise_kernel's one-column case.

Entry points: DETECTED, TABLE_ISA.
"""
from alt_jax import device

DETECTED = device.detect_isa()
TABLE_ISA = device.AVX2 if DETECTED.name == device.AVX512.name else DETECTED
