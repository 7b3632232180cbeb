"""Traffic control: which sends are let through, when, and from which sender."""
