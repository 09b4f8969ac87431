"""Published numbers that ``ltbench reproduce`` compares against: one YAML file per table (see ltbench.reproduce).

Data only. Every number names its source (paper and table, or repository and file) and how it was checked.
"""
