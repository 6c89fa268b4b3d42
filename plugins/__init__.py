"""lorakit's built-in steps. Each module is a plugin registered through the ``lorakit`` entry points,
exactly like a third-party plugin; nothing here is imported by the host directly."""
