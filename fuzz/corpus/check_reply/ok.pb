
2free"*2prompts†"ê
X-Served-By	limitador