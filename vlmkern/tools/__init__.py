"""Developer tools run as ``python -m vlmkern.tools.<name>``; nothing here is imported by the library itself."""
