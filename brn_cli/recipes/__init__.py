"""End-to-end flows built on the library: demo, paper reproduction, benchmarks, sample pretraining.
May import anything below cli/."""
