"""Virtual patient cohort and radiograph simulator (docs/cohort.md).

Everything made here is synthetic: simulated patients and simulated radiographs, for training,
tests and demonstrations. No figure computed on it is a clinical accuracy.
"""
