"""Pictures of what the detectors do: :func:`render_refinement` (DEQ refinement step by step)."""

from .refinement import default_steps, render_refinement, trace_refinement

__all__ = ["default_steps", "render_refinement", "trace_refinement"]
