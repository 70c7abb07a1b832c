"""The slave side: fshub and the executor of real system calls."""
