"""One module per job: audit, fold, convert, export, check."""
