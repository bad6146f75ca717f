"""Checkpoints from and for elsewhere: the reference's released ``.pt`` files and side files
(``reference_side_files.py``, ``importer.py``), and policies shared on the Hugging Face Hub as portable
folders (``policy_folder.py``)."""
