"""Where models and text come from: token data (tokenize, pack, split: :mod:`.data`), the offline
SmolLM2 and corpora (:mod:`.offline`), and the ``MODEL`` specs the CLI and the zoo load (:mod:`.models`).
Layered in that order: ``data`` imports neither of the others, ``offline`` may import ``data``, ``models``
both.
"""
