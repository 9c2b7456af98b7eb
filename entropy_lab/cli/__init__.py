"""entropy_lab.cli"""
