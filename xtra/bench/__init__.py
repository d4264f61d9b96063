"""Throughput benchmarks (`xtra bench`): `cli` and one module per benchmark (`gpu`, `attention`, `data`,
`sweep`). They measure and print; nothing in training or probing imports this package."""
