"""``lorakit review``: a local web page to look at a dataset and curate it by hand.

``app.create_app`` builds the ASGI application; ``command.review`` is the CLI command; edits go
through ``lorakit.curation`` (``edits.py``), never straight to the files.
"""
