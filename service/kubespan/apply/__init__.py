"""The imperative shell: the only code that reads or changes the kernel."""
