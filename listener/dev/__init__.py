"""Development aids: the demo and the provider simulators (STYLE: ``dev/``)."""
