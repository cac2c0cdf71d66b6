"""Backend interface, dispatch and the chunked torch backend."""
