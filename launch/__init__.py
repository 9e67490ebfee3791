"""Entry points that start dsjax somewhere else: `python -m launch.modal_h100` trains on Modal GPUs.

plan.py (flags -> a checked launch plan, offline), sync.py (manifest-based uploads and
downloads over a small volume interface), remote.py (the body that runs in the container),
modal_app.py (the Modal image, volumes and functions; the only module that imports modal).
"""
