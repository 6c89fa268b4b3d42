"""Registers the ``lorakit train`` command through the same ``register_commands`` hook plugins use."""
from lorakit.plugin_sdk import hookimpl


@hookimpl
def register_commands(cli):
    pass
