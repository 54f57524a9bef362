"""dropwise: model surgery around the dropout family, and a service for its predictions.

The layers import in one direction, bottom to top:

- ``dropwise.errors``: the one error base every layer raises from;
- ``dropwise.package``: the on-disk model package format (manifest, checksums, safetensors weights);
- ``dropwise.models``: the dropout family as layers, reference networks, datasets, the training loop;
- ``dropwise.surgery``: find / fold / MC / split / export / parity on any ``nn.Module``;
- ``dropwise.service``: the HTTP prediction service over model packages;
- ``dropwise.cli`` and ``dropwise.commands``: the command line, training orchestration and first start.
"""

__version__ = "0.1.0"
