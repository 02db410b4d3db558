"""Measuring instruction following (docs/guide.md, "Instruction vectors"): the instruction sets
and their checkers (`verify`), and the grid of conditions `localsteer eval` runs (`grid`)."""
