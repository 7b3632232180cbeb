"""Traffic control: when and where messages may go (scheduled sends, quiet hours)."""
