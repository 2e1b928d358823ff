"""A static HTML report of a finished job's results (``posebatch report``)."""
