"""Built-in step module 'booru' (registered through lorakit's own entry points). Steps land in their issue."""
from lorakit.plugin_sdk import hookimpl


@hookimpl
def register_steps(register):
    pass
