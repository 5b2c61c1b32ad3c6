"""Models and tasks that ship with mpq, so the main job needs no network and no training."""
