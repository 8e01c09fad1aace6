"""natvision transforms: one module per pipeline stage.

sources -> decode -> preprocess -> inference -> sinks, with ``models`` holding
the registry of known models and the code that resolves and loads them.
"""

__version__ = "0.1.0"
