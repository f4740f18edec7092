"""Discovery: the blind service that stores sealed blobs, and the client nodes use."""
