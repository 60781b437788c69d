from prism.cli import console

console()
