"""Diffusion math: noise schedules, training objectives, samplers, guidance. All pure functions."""
