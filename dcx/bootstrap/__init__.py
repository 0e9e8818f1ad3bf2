"""Bootstrap: ordered phases run over many hosts in parallel over SSH."""
