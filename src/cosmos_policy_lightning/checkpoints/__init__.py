"""Checkpoints from and for elsewhere: the reference's released ``.pt`` files and side files
(``reference.py``, ``importer.py``), and policies shared on the Hugging Face Hub (``hub.py``)."""
