"""celebscan's producer side: the CLI, listing sources, planning scans and handing out batches."""
