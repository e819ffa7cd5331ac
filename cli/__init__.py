"""The gradscope command line: thin click commands over the library (installed as gradscope_cli)."""
