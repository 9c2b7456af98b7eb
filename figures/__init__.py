"""entropy_lab.figures"""
