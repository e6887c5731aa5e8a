"""Batch Renorm inside other frameworks' trainers, as optional extras.

* :mod:`brn_cli.integrations.lightning`: ``BatchRenormCallback`` for a Lightning ``Trainer``
  (``pip install "brn[lightning]"``);
* :mod:`brn_cli.integrations.hf`: ``BatchRenormCallback`` for a Hugging Face ``Trainer``
  (``pip install "brn[hf]"``).

Each module imports its framework when imported, so import the one you use; nothing in ``brn_cli`` imports
them.
"""
